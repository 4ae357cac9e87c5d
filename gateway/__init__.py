"""The HTTP gateway: admits, publishes, and reports tasks; never runs task code."""
