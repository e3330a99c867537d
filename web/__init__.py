"""edgegpt.web: the browser runtime's files (an ES module and its page), package data that `edgegpt web` serves.

The JavaScript lives beside this file (edgegpt.js, src/, index.html, app.js); see runtime/serve/web.py.
"""
