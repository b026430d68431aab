"""The nodes and their schedule: what each role does with each message
(socket-free, clock-free), the rules of which message a node may take next,
and the in-process reference that drives the same nodes through queues."""
