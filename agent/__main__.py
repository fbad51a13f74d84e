"""`python -m agent` is the `kvmscope` command."""

from agent.cli import main

if __name__ == "__main__":
    main()
