"""``python -m llama2_lit.gold_compare`` (the command the README and users' scripts type): the tool lives in
``llama2_lit.tools.gold_compare``."""
import sys

from llama2_lit.tools.gold_compare import *  # noqa: F401,F403
from llama2_lit.tools.gold_compare import main

if __name__ == "__main__":
    sys.exit(main())
