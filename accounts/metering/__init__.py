"""Metering: the whole life of a metered request, in one place.

identity (authentication decides the tenant) → limits → requests per minute → tokens per
minute → monthly quota → charge and usage row, or a refusal row. Views subclass
`MeteredAPIView` and hand its `meter` to the service that does the work; the service calls
`check_inputs`, `reserve` and `served` in that order (see meter.py).
"""
