"""kopf handlers, one module per kind; ``sync`` holds the read-decide-apply step they trigger."""
