"""Metrics and evaluation runners (installed as lsquant.eval)."""
