"""Shared plumbing with no model or training knowledge: config loading and errors."""
