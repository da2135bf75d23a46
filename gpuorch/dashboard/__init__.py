"""gpuorch-dashboard: a web dashboard of a gpuorch cluster, a client of the public gRPC API through
the SDK only (it can do nothing its user could not do with gpuctl).

    main.py       the command: flags, TLS on the listen port, serving
    feed.py       the shared views, read on a timer and published to every open page (server-sent events)
    shapes.py     wire messages as the JSON the pages and /api/v1/ serve
    sessions.py   sign-in sessions (token kept server side, HttpOnly SameSite=Strict cookie) and CSRF tokens
    app.py        the pages, /api/v1/ and the actions
    streams.py    per-viewer streams: a job as it changes (WatchJob), a rank's log as it grows
    static/       HTML, CSS and plain JavaScript (no build step, nothing from a CDN)

Nothing else in gpuorch imports this package (it needs aiohttp: pip install 'gpuorch[dashboard]').
"""
