"""Thin HTTP routes; the work happens in app.service modules and the engine."""
