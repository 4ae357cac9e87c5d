"""The compute worker: consumes task queues and runs task functions in child processes."""
