"""PURE decisions of the operator: validation, desired-vs-actual diffs, status and conditions."""
