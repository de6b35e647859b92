"""`tinyfs serve`: the mount's namespace over WebDAV (WsgiDAV) and plain HTTP, on the core.

  server.py   the process: the archive's lock, cheroot (threads, TLS), shutdown
  app.py      the WSGI application: request checks, who may do what (auth.py), then the plain-HTTP
              routes (http.py) or WsgiDAV over the provider (dav.py)
  dav.py      the WsgiDAV provider: the top level, dispatching each section to its module
  views.py    resources/, instances/, aip/, events.jsonl (read-only)
  deposits.py transactions/ and commit/ (core.deposit underneath)
  http.py     plain HTTP: JSON states and listings, a state as a tar or zip bag, the event log
"""
