"""Worker backends built from recipes (PKGBUILD format): read, build, install, list.

- pkgbuild: recipes found in the configured recipe directories, read by sourcing them in bash.
- build: one build (fetch and check sources, prepare/build/check/package, atomic install).
- installs: install jobs (one per worker type at a time, watchable, cancellable, persisted) and
  the services' own environment as "system" installs.
"""
