// App Service Authentication ("Easy Auth") with Microsoft Entra ID, deployed only with
// foundryApi=entra. It lets the Foundry SDK's bearer token be the credential of /api/foundry:
// the platform validates the token (issuer: this tenant; audience; optionally the principal)
// and passes the caller on as X-MS-CLIENT-PRINCIPAL-ID, which it strips from client requests.
//
// Authentication stays optional for the app as a whole (AllowAnonymous): the management API keeps
// its function keys and webhook routes their signatures. /api/foundry itself refuses any request
// without a validated principal, and refuses everything while the platform's authentication is off
// (routines/foundry_api.py), so the surface is never served unauthenticated.

param functionAppName string

@description('Client id of the Entra app registration whose tokens are accepted. Required: a deployment without it fails here.')
@minLength(36)
@maxLength(36)
param clientId string

@description('Accepted token audiences; empty means api://<clientId>.')
param audiences array = []

@description('Object ids of the users, groups\' members or service principals allowed; empty allows any principal of the tenant holding a token for an accepted audience.')
param allowedPrincipalIds array = []

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: false
      unauthenticatedClientAction: 'AllowAnonymous'
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: clientId
          openIdIssuer: 'https://sts.windows.net/${tenant().tenantId}/'
        }
        validation: {
          allowedAudiences: empty(audiences) ? [
            'api://${clientId}'
          ] : audiences
          defaultAuthorizationPolicy: empty(allowedPrincipalIds) ? {} : {
            allowedPrincipals: {
              identities: allowedPrincipalIds
            }
          }
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
  }
}
