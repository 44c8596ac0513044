"""Key ceremonies: declarative scripts, the runner that walks people through them, transcripts.

The pure parts (``script``, ``state``, ``transcript``, ``render``) do no I/O; ``journal``,
``terminal``, ``service``, ``actions``, ``runner``, ``rehearsal`` and ``cli`` are the adapters.
See docs/ceremonies.md.
"""
