"""Operator services and the jobs they run, behind ``/admin``: persona uploads, files and deletes,
extraction jobs, bakes and baked models, mapping fits and mapped personas; the job registry and its
admission (who of the heavy work runs now, who waits, who is turned away). The request path
(``server.serving``) never imports this package."""
