"""The operator console: web pages and a JSON API over the node's job store and egress (``node.http``).

``app.py`` builds the Starlette application and runs it with uvicorn on a thread of the node's process
(:class:`~node.http.app.ConsoleServer`); ``auth.py`` checks users (argon2 password hashes), bearer tokens
(SHA-256), login sessions and CSRF; ``data.py`` gathers what pages and API show (one source for both);
``views.py`` holds the endpoints; ``client.py`` is the API client of ``recon-node status --url``.

Everything here but ``client.py`` needs the ``web`` extra (starlette, uvicorn, jinja2, argon2-cffi), imported only
when the console is switched on; ``recon-node check`` says when it is missing.
"""
