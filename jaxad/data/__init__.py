"""Data sources: MVTec-layout folders (`folder`) and the synthetic default dataset (`synthetic`).

Submodules are imported explicitly (e.g. ``from jaxad.data import folder``) so
that importing this package stays cheap.
"""
