"""The admission service: token-aware quotas, priority classes and fair queueing.

The decision core is plain, network-free Python (`clock`, `bucket`, `limits`,
`scheduler`, `controller`); the gRPC servicer, the PostgreSQL policy store and the
Envoy wiring sit on top of `AdmissionController`.
"""
