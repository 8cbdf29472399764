"""Sub-commands of the ``kanseg`` CLI; each module has ``register(subparsers)``."""
