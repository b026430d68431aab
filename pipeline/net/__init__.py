"""The sockets and the processes around them: ZeroMQ sockets and inboxes,
the pump around a node, a worker's control link, CURVE security, delay
lines, the engines that start ranks and how ranks find each other, the
cluster file, and this process's memory."""
