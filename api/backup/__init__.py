"""Client tools that seal a directory into an archive and restore it (docs/restore.md).

``archive`` is the pure format (manifest, paths, contexts, associated data, key commitments,
signatures); ``aead`` wraps Tink's streaming AEAD; ``service`` speaks to Embassy KMS as a
machine (login, DPoP); ``seal`` and ``restore`` do the files, with ``work`` (a thread pool that
stops at the first failure) and ``progress`` (the bar on stderr); ``cli`` registers
``ekms backup seal`` and ``ekms restore``. ADR 0009 says why the archive looks as it does.
"""
