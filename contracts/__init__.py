"""What the gateway and the compute workers share: values, messages, task declarations, topology."""
