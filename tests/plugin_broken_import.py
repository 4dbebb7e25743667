"""A plug-in module whose own import fails (a dependency that is not installed), for the error-message tests."""

import fedunlearn_test_dependency_that_does_not_exist  # noqa: F401


def factory(input_shape, num_classes):  # never reached
    raise AssertionError
