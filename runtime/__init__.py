"""What the gateway and the workers both run on: the broker connection, declaring the
topology, background tasks, logging. The I/O that `contracts` leaves out."""
