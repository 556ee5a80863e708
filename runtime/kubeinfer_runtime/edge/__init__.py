"""Edge fleets (SageMaker Edge Manager): the fleet server and the device agent.

The fleet server (``server``, ``store``, ``controller``, ``waves``) answers the device
API of ``contract.edge`` and rolls versions out in waves; the device side
(``agent``, ``package``, ``signing``, ``capture_buffer``) builds signed packages,
installs them on a device and serves them there.
"""
