"""``python -m llama2_lit.overopt`` (the command the README and users type): the tool lives in
``llama2_lit.tools.overopt``."""
import sys

from llama2_lit.tools.overopt import *  # noqa: F401,F403
from llama2_lit.tools.overopt import main

if __name__ == "__main__":
    sys.exit(main())
