"""shmpool: process pools over shared memory."""
