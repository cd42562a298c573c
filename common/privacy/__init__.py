"""Privacy a data owner can state: client-level differential privacy (``dp``, ``accountant``,
``geometry``), sample-level DP-SGD inside a client (``dpsgd``), secure aggregation
(``secagg``, ``shamir``) and their round.yaml section (``config``). docs/PRIVACY.md describes
the mechanisms and the threat model."""
