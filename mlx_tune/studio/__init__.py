"""The studio: a browser page served by the API server at ``/studio``.

Three views over what the other stages produce: the playground (answers of several
served models to one prompt, streamed side by side through ``/v1/chat/completions``),
runs (``metrics.jsonl`` charts, config, fuse and test reports of the training runs
under ``--runs-dir``; one click loads a run's adapter through ``POST /v1/adapters``)
and data (rows of a data folder rendered as training sees them, trained tokens
highlighted, with split counts and a length histogram).

``routes.attach(app, ...)`` adds the routes; ``files`` confines every path a request
names to the configured folders; ``views`` builds the JSON the page draws. The page is
static files shipped in ``assets/`` (the charting library, uPlot, vendored at a pinned
version with its license), so the browser asks no other host and no build step runs.
"""
