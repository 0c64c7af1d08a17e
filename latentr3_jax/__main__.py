import sys

from latentr3_jax.cli import main

sys.exit(main())
