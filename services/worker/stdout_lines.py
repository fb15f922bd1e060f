"""The lines a worker process prints on its stdout, for the pool that started it.

A worker logs to stderr; stdout carries only these markers, each on a line of its own, so the
pool (services.worker.pool) follows a start without polling the network:

- SPARE_READY: a warm spare (services.worker.spare) has imported its engine and waits for its
  launch line.
- SERVING: the worker's health service has just turned SERVING. The pool then checks health
  once, at once, instead of at its next poll (a warm spare serves within ~0.1 s, and polling
  every 0.1 s used to add up to a poll interval to every spawn). A worker of an older install
  that prints nothing is still found by the poll.
"""

SPARE_READY = "rbee-worker spare: ready"
SERVING = "rbee-worker: serving"
