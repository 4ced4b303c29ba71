"""Ready-to-run replicated services built on zrepl."""
