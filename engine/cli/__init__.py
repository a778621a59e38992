"""The ``dccsign`` command: :mod:`.main` builds the parser and runs a command; ``serve`` and
``audit`` have modules of their own; :mod:`.args` holds the shared argument types. Command
groups installed by other packages (``dccsign bench``) register through the
``dccsign.commands`` entry point group."""
