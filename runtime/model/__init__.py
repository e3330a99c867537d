"""The model wing: a bundle checked and opened (bundle, graph paths, ORT format, contract), and the session
that runs it (session: its config; providers, huge pages)."""
