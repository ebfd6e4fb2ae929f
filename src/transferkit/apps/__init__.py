"""Applications on top of the Python API: the ``transferkit`` command (``cli``), the web server and its page
(``serve``, ``static/index.html``) and the embedded demo (``demo``)."""
