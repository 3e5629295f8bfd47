"""Benchmarks (scripts): attention.py, decode.py, model.py; common.py holds shared helpers.

A package only so that notebooks can reuse the measurement code
(`from benchmarks import model`); each script also runs on its own.
"""
