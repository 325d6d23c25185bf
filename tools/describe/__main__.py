"""`python -m tools.describe ...` runs the describe-and-score stage (see tools/describe/stage.py)."""

from tools.describe.stage import main

if __name__ == "__main__":
    main()
