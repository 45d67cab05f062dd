"""``python -m llama2_lit.summarize`` (the command the README and users' scripts type): the tool lives in
``llama2_lit.tools.summarize``."""
import sys

from llama2_lit.tools.summarize import *  # noqa: F401,F403
from llama2_lit.tools.summarize import main

if __name__ == "__main__":
    sys.exit(main())
