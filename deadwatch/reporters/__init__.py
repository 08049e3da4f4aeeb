"""Reporters: where reports go. Each has emit(report) and close()."""
