"""Operations: the ``kernelgen`` subcommands this package contributes (serve, init, import,
inspect) and the supervisor of worker processes.

The top layer: may import every other layer. ``cli`` imports no torch until a command runs.
"""
