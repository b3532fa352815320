"""Serving plane: Ray Serve gateway + LLM deployment, engines, adapter hot swap."""
