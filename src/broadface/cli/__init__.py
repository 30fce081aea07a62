"""Command-line interface: one small module per sub-command.

Each module in this package that defines ``register(subparsers)`` becomes a
sub-command of ``broadface``. ``register`` adds its parser and sets
``func=run`` where ``run(args) -> int`` does the work (importing heavy modules
lazily so ``broadface --help`` stays fast).
"""
