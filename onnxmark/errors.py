"""Errors that onnxmark reports to the user."""


class OnnxmarkError(Exception):
    """An input or state problem that the user can fix; the command line reports it and exits with status 2."""
