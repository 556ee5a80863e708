"""``python -m kubeinfer_operator``: the ``kubeinfer`` command (``entry.main``)."""

from kubeinfer_operator.entry import main

if __name__ == "__main__":
    main()
