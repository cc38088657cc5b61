// The one storage account of a deployment: Functions host storage, the Flex deployment package
// container, and Routines' own queue and tables. Shared-key (account key / SAS) access is off:
// everything authenticates with Microsoft Entra ID.
//
// The queues and tables are also created by the app at start if missing (idempotent), so a
// deployment made without this template and one made with it end in the same state.

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param name string

param location string = resourceGroup().location
param tags object = {}

@description('Blob container that holds the Flex Consumption deployment package.')
param deploymentContainerName string

@description('Dispatch queue (ROUTINES_QUEUE_NAME). Its poison queue is "<name>-poison".')
@minLength(3)
@maxLength(56)
param queueName string

@description('Prefix of every Routines table (ROUTINES_TABLE_PREFIX).')
@minLength(1)
@maxLength(40)
param tablePrefix string

@description('Blob container for archived runs (ROUTINES_RUN_ARCHIVE_CONTAINER); empty for none.')
param archiveContainerName string = ''

// Table names are <prefix><suffix>; keep in step with the tables the app creates.
var tableSuffixes = [
  'Routines'
  'Runs'
]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource archiveContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = if (!empty(archiveContainerName)) {
  parent: blobService
  name: archiveContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource dispatchQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: queueName
}

// The Functions host moves a message here after maxDequeueCount failed deliveries.
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: '${queueName}-poison'
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for suffix in tableSuffixes: {
  parent: tableService
  name: '${tablePrefix}${suffix}'
}]

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
