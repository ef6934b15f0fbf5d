"""The one-time embedding pass: tiles stream from slides through every backbone into
per-backbone LanceDB tables of float16 vectors, with provenance and resume."""
