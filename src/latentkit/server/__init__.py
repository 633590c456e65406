"""``latentkit serve``: an HTTP API over ``generate()``, a job queue and its worker.

``jobs`` holds the queue and knows nothing of HTTP; ``app`` is the FastAPI application
(an optional extra, ``pip install latentkit[serve]``); ``cli`` is the verb.
"""
