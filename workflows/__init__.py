"""Starter workflows users copy into .github/workflows/ (`mlci init` installs them); shipped as mlci.workflows."""
