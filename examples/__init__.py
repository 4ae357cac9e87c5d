"""Task modules written as a user writes them: `timebox-worker examples.tasks`."""
