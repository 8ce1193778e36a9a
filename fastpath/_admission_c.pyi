# The compiled twin of _admission_py: the same source, so the same API.
from fastpath._admission_py import AdmissionConfig as AdmissionConfig
from fastpath._admission_py import Admitter as Admitter
