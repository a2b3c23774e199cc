"""The research loop: CLI, runner, agents, git, ledger, report, guards."""
