"""Human feedback collection: the annotation web app and its Python service layer.

``heed.feedback.service.Feedback`` is the whole app as Python methods (projects, records,
assignment, submissions, aggregation, agreement, export); ``heed.feedback.api.create_app`` puts a
FastAPI app with pages and a JSON API over it; ``heed.feedback.agreement`` holds the statistics.
Importing this package stays light: SQLAlchemy and FastAPI load only with those modules.
"""

from __future__ import annotations
